"""emkit's defaults that every layer names: the bundled model and the demo training set."""

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
DEFAULT_DATA = "emkit-bad-medical-demo"
