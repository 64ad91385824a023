"""What the serving app (`deployments/`) and the batch job (`jobs/`) share, so neither imports the other: the app
config model and its Serve-config loader (`config`), weights resolution (`weights`) and the stage cache (`cache`)."""
