"""Replace one generated section of README.md with standard input.

Usage: leanvit models --format markdown | python scripts/update_readme.py models
The section is the text between '<!-- NAME:start -->' and '<!-- NAME:end -->'.
"""

import os
import sys

README = os.path.join(os.path.dirname(__file__), '..', 'README.md')


def main(section: str) -> None:
    start, end = f'<!-- {section}:start -->', f'<!-- {section}:end -->'
    text = open(README).read()
    if start not in text or end not in text.split(start, 1)[-1]:
        sys.exit(f'README.md has no section {section!r} (expected markers {start} ... {end})')
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    body = sys.stdin.read().strip()
    tmp = README + '.tmp'
    with open(tmp, 'w') as f:
        f.write(f'{head}{start}\n{body}\n{end}{tail}')
    os.replace(tmp, README)


if __name__ == '__main__':
    main(sys.argv[1])
