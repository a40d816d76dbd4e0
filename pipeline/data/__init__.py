"""Tasks, prompt templates, verbalizers and dataset loading."""
