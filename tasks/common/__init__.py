"""What the stages share: params, files, devices, checkpoints, datasets, FID, tracking. No stage lives here."""
