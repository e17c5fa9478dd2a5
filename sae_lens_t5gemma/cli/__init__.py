"""The ``sae-lens-t5gemma`` command line."""
