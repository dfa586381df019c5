import sys

from vllm_moeplace.cli.main import main

sys.exit(main())
