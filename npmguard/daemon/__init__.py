"""The background daemon: watcher, socket server and tray, each a worker."""
