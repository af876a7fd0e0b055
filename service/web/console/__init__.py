"""The operator console: server-rendered pages for the privacy team on the admin listener
(`/ui/`), signed in with the API token; plain HTML forms and CSS, no script."""
