"""One module per explorer page; each has `render(data: ExplorerData)`."""
