"""Training: the step loop (train.py, epoch.py, step.py), its data and run folder, resume, presets and the ablation."""
