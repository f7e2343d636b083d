"""Recipes from docs/recipes.md: one runnable app per auth library, each run by a test."""
