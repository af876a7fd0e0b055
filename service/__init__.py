"""Copernica data-request receiver: files requests, receives callbacks, archives to S3."""
