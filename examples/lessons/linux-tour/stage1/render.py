#!/usr/bin/env python3
"""Renders a Jinja2 template with the data in a YAML file and prints the result.

Usage: python3 render.py [DATA.yml [TEMPLATE.j2]]
By default, devices.yml and interfaces.j2 from this script's own directory.
"""
import os
import sys

import jinja2
import yaml

here = os.path.dirname(os.path.abspath(__file__))
data_file = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, 'devices.yml')
template_file = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, 'interfaces.j2')

with open(data_file) as f:
    data = yaml.safe_load(f)

# StrictUndefined: a name the data lacks is an error, not an empty string in the output.
env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(os.path.dirname(os.path.abspath(template_file))),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
template = env.get_template(os.path.basename(template_file))
sys.stdout.write(template.render(data))
