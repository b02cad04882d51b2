"""Answers out: decoding samples into guesses and regions, place names, maps and exports."""
