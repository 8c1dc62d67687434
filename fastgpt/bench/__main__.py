"""python -m fastgpt.bench: the same as `fastgpt bench`."""

import sys

from fastgpt.bench import main

sys.exit(main())
