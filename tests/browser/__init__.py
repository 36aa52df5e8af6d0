"""Browser tests: headless Chromium (Debian's) driving the demo store on `flyfn dev`."""
