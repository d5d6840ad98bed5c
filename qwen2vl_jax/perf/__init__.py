"""Performance estimation without an accelerator: the train step compiled ahead of time for a TPU topology on
a CPU host (`aot`) and the step-time estimate read from the compiled program (`roofline`)."""
