"""The keepers become a training file and a job: export, held-out values, fine-tuning."""
