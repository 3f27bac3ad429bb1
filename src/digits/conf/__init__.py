"""The configs, shipped with the package: Hydra reads them as the module `digits.conf`."""
