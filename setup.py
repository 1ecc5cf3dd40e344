import re

from setuptools import setup
from setuptools.command.sdist import sdist


class SdistWithDocsAndTests(sdist):
    """The source distribution also ships the protocol, the tests and the
    benchmark, without a MANIFEST.in beside the files the project keeps."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, list(files) + [
            "PROTOCOL.md", "test_proxysession.py", "bench_proxysession.py"])


with open("proxysession.py", encoding="utf-8") as source:
    version = re.search(r'^__version__ = "([^"]+)"', source.read(), re.M).group(1)
with open("README.md", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="proxysession",
    version=version,
    description="Publish Python objects on a network broker and call them from anywhere "
                "(the heir of Perl's POEx::ProxySession), in one stdlib-only module",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    py_modules=["proxysession"],
    python_requires=">=3.8",
    entry_points={"console_scripts": ["proxysession = proxysession:main"]},
    cmdclass={"sdist": SdistWithDocsAndTests},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
        "Topic :: System :: Distributed Computing",
    ],
)
