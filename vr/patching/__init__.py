"""Live patches: signed release bundles and the releases installed side by side."""
