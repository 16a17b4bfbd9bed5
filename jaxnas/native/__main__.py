"""``python -m jaxnas.native``: build the oneDNN convolutions now and say whether they work."""

import sys

from jaxnas.native import main

sys.exit(main())
