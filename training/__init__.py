"""Offline stages of homefeed: simulate | ingest -> validate -> features -> dataset -> train."""
