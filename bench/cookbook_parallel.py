"""A minimal, faithful version of OpenAI's cookbook script
``examples/api_request_parallel_processor.py`` (openai-cookbook, MIT licence), the
parallel-request script widely copied for bulk generation. A BASELINE for
bench/generate.py, not part of gridtune.

What is kept from the original, as it is there:
- requests are sent from a queue as fast as the request and token "capacity" allow,
  the capacities refilling continuously at max_requests_per_minute / 60 and
  max_tokens_per_minute / 60 per second, capped at one minute's worth (a full
  minute's burst at the start);
- a request's token cost is the cookbook's num_tokens_consumed_from_request: the
  prompt's tiktoken count (+3 a message, +3 priming) plus max_tokens × n;
- aiohttp, one ClientSession (so at most 100 connections, aiohttp's default),
  ``await (await session.post(...)).json()``;
- a response with an "error" is retried while attempts are left (max_attempts 5;
  every error uses one, rate limits included); if its message says "rate limit", the
  whole loop pauses seconds_to_pause_after_rate_limit_error (15 s of a minute)
  after it; an exception (a broken body) is retried the same way;
- the main loop sleeps 1 ms per turn; results are appended to a JSONL file.

Only what a benchmark needs differs: the requests come from a list rather than a
file, the "minute" can be scaled (``period_s``, for a window shorter than 60 s; the
pause scales with it), and the run returns its counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StatusTracker:
    num_tasks_started: int = 0
    num_tasks_in_progress: int = 0
    num_tasks_succeeded: int = 0
    num_tasks_failed: int = 0
    num_rate_limit_errors: int = 0
    num_api_errors: int = 0
    num_other_errors: int = 0
    time_of_last_rate_limit_error: float = 0.0


@dataclass
class APIRequest:
    task_id: int
    request_json: dict
    token_consumption: int
    attempts_left: int
    result: list = field(default_factory=list)

    async def call_api(self, session: Any, request_url: str, request_header: dict,
                       retry_queue: asyncio.Queue, save_filepath: str, status_tracker: StatusTracker) -> None:
        error = None
        try:
            async with session.post(url=request_url, headers=request_header, json=self.request_json) as response:
                response = await response.json(content_type=None)
            if "error" in response:
                status_tracker.num_api_errors += 1
                error = response
                if "rate limit" in str(response["error"].get("message", "")).lower():
                    status_tracker.time_of_last_rate_limit_error = time.time()
                    status_tracker.num_rate_limit_errors += 1
                    status_tracker.num_api_errors -= 1
        except Exception as e:  # noqa: BLE001 - as the original: any exception is a retry
            status_tracker.num_other_errors += 1
            error = e
        if error:
            self.result.append(error)
            if self.attempts_left:
                retry_queue.put_nowait(self)
            else:
                append_to_jsonl([self.request_json, [str(e) for e in self.result]], save_filepath)
                status_tracker.num_tasks_in_progress -= 1
                status_tracker.num_tasks_failed += 1
        else:
            append_to_jsonl([self.request_json, response], save_filepath)
            status_tracker.num_tasks_in_progress -= 1
            status_tracker.num_tasks_succeeded += 1


def append_to_jsonl(data: Any, filename: str) -> None:
    with open(filename, "a") as f:
        f.write(json.dumps(data) + "\n")


def num_tokens_consumed_from_request(request_json: dict, encoding: Any) -> int:
    max_tokens = request_json.get("max_tokens", 15)
    n = request_json.get("n", 1)
    completion_tokens = n * max_tokens
    num_tokens = 0
    for message in request_json["messages"]:
        num_tokens += 4
        for key, value in message.items():
            num_tokens += len(encoding.encode(value))
            if key == "name":
                num_tokens -= 1
    num_tokens += 2
    return num_tokens + completion_tokens


async def process_api_requests(requests: list[dict], request_url: str, api_key: str, save_filepath: str,
                               max_requests_per_minute: float, max_tokens_per_minute: float,
                               max_attempts: int = 5, period_s: float = 60.0) -> StatusTracker:
    import aiohttp

    from gridtune.pipeline.format.tokens import get_encoding  # tiktoken's cl100k/o200k, offline

    seconds_to_pause_after_rate_limit_error = 15 * period_s / 60
    seconds_to_sleep_each_loop = 0.001
    request_header = {"Authorization": f"Bearer {api_key}"}
    encoding = get_encoding(requests[0].get("model") if requests else None)

    queue_of_requests_to_retry: asyncio.Queue = asyncio.Queue()
    task_id = 0
    status_tracker = StatusTracker()
    next_request = None
    available_request_capacity = max_requests_per_minute
    available_token_capacity = max_tokens_per_minute
    last_update_time = time.time()
    pending = iter(requests)
    file_not_finished = True
    tasks = set()

    async with aiohttp.ClientSession() as session:
        while True:
            if next_request is None:
                if not queue_of_requests_to_retry.empty():
                    next_request = queue_of_requests_to_retry.get_nowait()
                elif file_not_finished:
                    try:
                        request_json = next(pending)
                        next_request = APIRequest(task_id, request_json,
                                                  num_tokens_consumed_from_request(request_json, encoding),
                                                  max_attempts)
                        task_id += 1
                        status_tracker.num_tasks_started += 1
                        status_tracker.num_tasks_in_progress += 1
                    except StopIteration:
                        file_not_finished = False

            current_time = time.time()
            seconds_since_update = current_time - last_update_time
            available_request_capacity = min(
                available_request_capacity + max_requests_per_minute * seconds_since_update / period_s,
                max_requests_per_minute)
            available_token_capacity = min(
                available_token_capacity + max_tokens_per_minute * seconds_since_update / period_s,
                max_tokens_per_minute)
            last_update_time = current_time

            if next_request:
                next_request_tokens = next_request.token_consumption
                if available_request_capacity >= 1 and available_token_capacity >= next_request_tokens:
                    available_request_capacity -= 1
                    available_token_capacity -= next_request_tokens
                    next_request.attempts_left -= 1
                    task = asyncio.create_task(next_request.call_api(
                        session, request_url, request_header, queue_of_requests_to_retry, save_filepath,
                        status_tracker))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    next_request = None

            if status_tracker.num_tasks_in_progress == 0:
                break

            await asyncio.sleep(seconds_to_sleep_each_loop)

            seconds_since_rate_limit_error = time.time() - status_tracker.time_of_last_rate_limit_error
            if seconds_since_rate_limit_error < seconds_to_pause_after_rate_limit_error:
                await asyncio.sleep(seconds_to_pause_after_rate_limit_error - seconds_since_rate_limit_error)
    return status_tracker
