"""What the Makefile's targets run beside the pipeline: `plan` (make offline's estimate), `setparams` (make demo),
`tidy`, `plots` (make plots) and `submit` (make submit)."""
