"""One router per resource: the pages, manifests (API), jobs (API) and files (videos, thumbnails, the script)."""
