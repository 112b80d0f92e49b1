import sys

from attnzoo.studies import main

sys.exit(main())
