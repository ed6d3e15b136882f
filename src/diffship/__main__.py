import sys

from diffship.cli import main

sys.exit(main())
