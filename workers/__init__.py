"""Worker-process side: the pipeline, its batchers and lifecycle."""
