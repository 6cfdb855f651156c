"""Test support code shared by the suite (never part of the product)."""
