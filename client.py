#!/usr/bin/env python3
"""Local proxy to a Vast.ai serverless endpoint on 127.0.0.1:8010 (see vespa/client/).

    python client.py --endpoint my-endpoint --api-key ENDPOINT_KEY
    python client.py --endpoint my-endpoint --account-key ACCOUNT_KEY
    python client.py --list
"""

import sys

from vespa.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
