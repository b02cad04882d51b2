"""Core maths: sphere geometry, schedules, the network, the generative families,
likelihoods and model files."""
