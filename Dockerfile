# syntax=docker/dockerfile:1
# The demo store's image. Every Machine of the Fly app runs it: the app Machines that serve the
# pages and the function Machines flyfn creates (same image, env FLYFN_GROUP) that draw receipts.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies in their own layer, rebuilt only when pyproject.toml changes: install the package's
# requirements against an empty stand-in of flyfn, then drop the stand-in.
WORKDIR /src
COPY pyproject.toml LICENSE ./
RUN mkdir flyfn && echo '__version__ = "0"' > flyfn/__init__.py && touch README.md \
    && pip install ".[demo]" \
    && pip uninstall -y flyfn \
    && rm -rf flyfn build ./*.egg-info

# flyfn itself, then the project.
COPY flyfn ./flyfn
RUN pip install --no-deps . && rm -rf /src

RUN useradd --create-home --uid 10001 app \
    && mkdir -p /app/data && chown app:app /app/data
WORKDIR /app
COPY demo_store ./demo_store
WORKDIR /app/demo_store
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput

# SQLite for a container on its own; on Fly the DATABASE_URL secret (a database every Machine
# can reach) takes precedence, because function Machines must read the same purchases.
ENV DATABASE_URL=sqlite:////app/data/db.sqlite3
USER app
EXPOSE 8000
# Two worker processes per Machine, as production servers run: whatever a worker keeps in memory
# (caches, counters) is not seen by the other; `flyfn dev` runs this command too.
CMD ["uvicorn", "demo_store.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
