"""Prepare the retrieval datasets: verify every image, crop where asked, and write one JSON index per crop type.

python data_utils.py --data_path data                      # every dataset folder present (car cub sop isc)
python data_utils.py --data_path data --data_name cub sop  # only these
python data_utils.py --data_path data --data_name demo     # synthetic demo, no download needed
python data_utils.py --data_path data --data_name mine --from_folder photos/      # photos/<class>/<image>
python data_utils.py --data_path data --data_name mine --from_csv photos/df.csv   # path,label,split[,...]

The command line lives in ``common.data.prepare`` (``get_args_parser``, ``main``).
"""

from common.data.prepare import get_args_parser, main
from common.errors import run_cli

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
