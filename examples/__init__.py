"""rnnfast's examples: real training runs with its layers, each against torch.nn's
(`python -m examples.<name> --help`)."""
