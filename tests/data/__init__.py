"""Tests of sslseg.data."""
