"""Accelerate launch profiles shipped with trl_safety (`--accelerate_config NAME`)."""
