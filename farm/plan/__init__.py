"""What to run, decided on the driver before anything runs: the sweep file's schema, its validation and
expansion into trials (spec, yamlmarks), and the devices: entries resolved into device jobs (devices).
Imports only farm.core below it."""
