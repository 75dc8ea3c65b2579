import sys

from palitorch.cli import main

sys.exit(main())
