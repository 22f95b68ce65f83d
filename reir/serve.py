"""Serve a trained REIR run's database over HTTP: a JSON search API, a web page and, with --allow-write, updates.

    python reir/serve.py --data_base results/reir/mine_data_base.pth     # then open http://127.0.0.1:8000/

See docs/serve.md (endpoints, limits, the write token, several workers).
"""

from common.cli import script
from common.errors import run_cli
from common.service import run_server, serve_parser
from reir.spec import SPEC

get_args_parser, main = script(serve_parser, run_server, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
