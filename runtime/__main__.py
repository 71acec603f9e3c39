"""`python -m runtime IN... -o OUT` is the same as `python -m runtime.upscale IN... -o OUT`."""

import sys

from runtime.upscale import main

sys.exit(main())
