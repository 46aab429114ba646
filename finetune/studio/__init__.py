"""`finetune studio`: a local web app over the same package (data, recipes, runs, comparisons).

See docs/studio.md. The server side lives here (cli, app, API modules, the run queue); the page is plain
files in static/. Nothing in this package trains, scans or validates by itself: it calls the code the CLI uses.
"""
