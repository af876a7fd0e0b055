"""The Copernica simulator: a faithful fake of the data-request API, for tests and demos."""
