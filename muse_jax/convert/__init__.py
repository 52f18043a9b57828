"""Converters from published weights (diffusers' aMUSEd, MaskGIT) into this project's models."""
