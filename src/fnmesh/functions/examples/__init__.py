"""Example functions built from data that ships with scikit-learn."""
