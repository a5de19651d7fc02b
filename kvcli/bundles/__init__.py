"""Making bundles, after eval in the data flow: calibrate, factor, then what a bundle measures
of itself with the engine and eval (the span chooser, the break-even, the self-check).
``make_bundle`` does it all; ``default_bundle`` is the embedded model's. The runtime
(kvcli.engine) only reads bundles."""
