"""Tests for minidask.config: defaults, files, environment and set()."""

import os
import threading

import pytest

from minidask import config


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """Point MINIDASK_CONFIG at an empty folder, with no other overrides.

    HOME moves to the temporary folder so that a developer's own
    ~/.config/minidask cannot change the results, and every MINIDASK_
    variable is removed. Afterwards the real configuration is rebuilt.
    """
    folder = tmp_path / "config"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in list(os.environ):
        if name.startswith("MINIDASK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MINIDASK_CONFIG", str(folder))
    config.refresh()
    yield folder
    monkeypatch.undo()
    config.refresh()


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_defaults_come_from_the_package_file(config_dir):
    assert config.get("comm.timeouts.connect") == "10s"
    assert config.get("scheduler.allowed-failures") == 3
    assert config.get("dashboard.link") == "{scheme}://{host}:{port}/status"
    assert config.get("scheduler-address") is None


def test_dashes_and_underscores_are_the_same(config_dir):
    assert config.get("scheduler.allowed_failures") == 3
    assert config.get("comm.max_frame_size") == "4 GiB"


def test_file_overrides_defaults_and_merges_sections(config_dir):
    write(config_dir, "site.yaml",
          "comm:\n  timeouts:\n    connect: 30s\n")
    config.refresh()

    assert config.get("comm.timeouts.connect") == "30s"
    # The sibling key in the same section keeps its default.
    assert config.get("comm.timeouts.handshake") == "5s"
    assert config.get("comm.max-frame-size") == "4 GiB"


def test_file_keys_with_underscores_are_canonical(config_dir):
    write(config_dir, "site.yaml", "scheduler:\n  allowed_failures: 9\n")
    config.refresh()

    assert config.get("scheduler.allowed-failures") == 9
    assert "allowed_failures" not in config.config["scheduler"]


def test_files_are_read_in_name_order(config_dir):
    write(config_dir, "b.yml", "scheduler:\n  allowed-failures: 2\n")
    write(config_dir, "a.yaml",
          "scheduler:\n  allowed-failures: 1\n  worker-ttl: 1s\n")
    write(config_dir, "c.txt", "scheduler:\n  allowed-failures: 100\n")
    config.refresh()

    assert config.get("scheduler.allowed-failures") == 2  # b after a
    assert config.get("scheduler.worker-ttl") == "1s"  # only in a
    assert config.get("scheduler.allowed-failures") != 100  # .txt skipped


def test_config_variable_may_name_one_file(config_dir, monkeypatch):
    path = write(config_dir, "only.conf", "logging:\n  buffer-length: 7\n")
    monkeypatch.setenv("MINIDASK_CONFIG", str(path))
    config.refresh()

    assert config.get("logging.buffer-length") == 7


def test_home_config_folder_is_read_before_config_variable(
        config_dir, tmp_path):
    home = tmp_path / ".config" / "minidask"
    home.mkdir(parents=True)
    write(home, "home.yaml", "nanny:\n  max-start-failures: 11\n"
          "logging:\n  buffer-length: 5\n")
    write(config_dir, "site.yaml", "logging:\n  buffer-length: 6\n")
    config.refresh()

    assert config.get("nanny.max-start-failures") == 11
    assert config.get("logging.buffer-length") == 6


def test_empty_file_is_allowed(config_dir):
    write(config_dir, "empty.yaml", "# nothing set here yet\n")
    config.refresh()

    assert config.get("scheduler.allowed-failures") == 3


def test_environment_sets_nested_keys(config_dir, monkeypatch):
    monkeypatch.setenv("MINIDASK_SCHEDULER__ALLOWED_FAILURES", "7")
    monkeypatch.setenv("MINIDASK_COMM__TIMEOUTS__CONNECT", "2s")
    monkeypatch.setenv("MINIDASK_SCHEDULER_ADDRESS", "tcp://10.0.0.5:8786")
    config.refresh()

    assert config.get("scheduler.allowed-failures") == 7
    assert config.get("comm.timeouts.connect") == "2s"
    assert config.get("comm.timeouts.handshake") == "5s"
    assert config.get("scheduler-address") == "tcp://10.0.0.5:8786"


def test_environment_values_are_python_literals_where_they_parse(
        config_dir, monkeypatch):
    monkeypatch.setenv("MINIDASK_WORKER__MEMORY__WARN", "0.5")
    monkeypatch.setenv("MINIDASK_SECRET", "None")
    monkeypatch.setenv("MINIDASK_EXTRA__LIST", "[1, 'two']")
    monkeypatch.setenv("MINIDASK_EXTRA__WORD", "hello world")
    config.refresh()

    assert config.get("worker.memory.warn") == 0.5
    assert config.get("secret") is None
    assert config.get("extra.list") == [1, "two"]
    assert config.get("extra.word") == "hello world"


def test_environment_keys_are_lower_cased(config_dir, monkeypatch):
    monkeypatch.setenv("MINIDASK_Extra__Some_Key", "1")
    config.refresh()

    assert config.get("extra.some-key") == 1


def test_config_variable_is_not_a_key(config_dir):
    assert config.get("config", "absent") == "absent"


def test_precedence_defaults_files_environment_set(config_dir, monkeypatch):
    write(config_dir, "site.yaml",
          "scheduler:\n  allowed-failures: 4\n  worker-ttl: 1m\n"
          "  task-stream-length: 10\n")
    monkeypatch.setenv("MINIDASK_SCHEDULER__WORKER_TTL", "2m")
    monkeypatch.setenv("MINIDASK_SCHEDULER__TASK_STREAM_LENGTH", "20")
    config.refresh()

    assert config.get("scheduler.bandwidth") == "100 MB/s"  # default
    assert config.get("scheduler.allowed-failures") == 4  # file
    assert config.get("scheduler.worker-ttl") == "2m"  # env over file
    with config.set({"scheduler.task-stream-length": 30}):
        assert config.get("scheduler.task-stream-length") == 30  # set
    assert config.get("scheduler.task-stream-length") == 20


def test_set_as_a_plain_call_stays_until_refresh(config_dir):
    config.set({"scheduler.allowed-failures": 8})
    assert config.get("scheduler.allowed-failures") == 8

    config.refresh()
    assert config.get("scheduler.allowed-failures") == 3


def test_set_keywords_use_double_underscore_for_dots(config_dir):
    with config.set(scheduler__allowed_failures=5,
                    comm__timeouts__connect="1s"):
        assert config.get("scheduler.allowed-failures") == 5
        assert config.get("comm.timeouts.connect") == "1s"
    assert config.get("scheduler.allowed-failures") == 3
    assert config.get("comm.timeouts.connect") == "10s"


def test_set_context_restores_previous_values_and_absence(config_dir):
    with config.set({"scheduler.allowed-failures": 1, "new.section.x": 2}):
        assert config.get("new.section.x") == 2

    assert config.get("scheduler.allowed-failures") == 3
    assert "new" not in config.config
    with pytest.raises(KeyError):
        config.get("new.section.x")


def test_nested_set_contexts_unwind_in_order(config_dir):
    with config.set({"logging.buffer-length": 1}):
        with config.set({"logging.buffer-length": 2}):
            assert config.get("logging.buffer-length") == 2
        assert config.get("logging.buffer-length") == 1
    assert config.get("logging.buffer-length") == 10000


def test_set_context_restores_after_an_exception(config_dir):
    with pytest.raises(RuntimeError):
        with config.set({"secret": "abc"}):
            raise RuntimeError("inside the block")
    assert config.get("secret") is None


def test_set_merges_nested_mappings(config_dir):
    with config.set({"comm": {"timeouts": {"connect": "3s"}}}):
        assert config.get("comm.timeouts.connect") == "3s"
        assert config.get("comm.timeouts.handshake") == "5s"
    assert config.get("comm.timeouts.connect") == "10s"


def test_set_below_a_leaf_replaces_it_and_restores_it(config_dir):
    with config.set({"secret.part": 1}):
        assert config.get("secret") == {"part": 1}
    assert config.get("secret") is None


def test_set_is_thread_safe(config_dir):
    errors = []

    def work(i):
        try:
            for _ in range(200):
                with config.set({f"threads.t{i}": i}):
                    assert config.get(f"threads.t{i}") == i
                    config.get("comm")
        except Exception as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert config.get("threads", {}) == {}


def test_get_missing_key_suggests_close_keys(config_dir):
    with pytest.raises(KeyError) as info:
        config.get("comm.timeout.connect")
    message = str(info.value)
    assert "'comm.timeout.connect'" in message
    assert "did you mean" in message
    assert "'comm.timeouts.connect'" in message


def test_get_missing_key_with_default(config_dir):
    assert config.get("no.such.key", 42) == 42
    assert config.get("no.such.key", None) is None


def test_get_below_a_leaf_is_missing(config_dir):
    with pytest.raises(KeyError, match="scheduler.allowed-failures.x"):
        config.get("scheduler.allowed-failures.x")


def test_get_returns_a_copy(config_dir):
    section = config.get("comm.timeouts")
    section["connect"] = "changed"
    assert config.get("comm.timeouts.connect") == "10s"


def test_refresh_keeps_the_config_dict(config_dir, monkeypatch):
    merged = config.config
    monkeypatch.setenv("MINIDASK_LOGGING__BUFFER_LENGTH", "12")
    config.refresh()

    assert config.config is merged
    assert merged["logging"]["buffer-length"] == 12


def test_malformed_yaml_names_file_and_line(config_dir):
    path = write(config_dir, "broken.yaml",
                 "scheduler:\n  allowed-failures: 3\n    worker-ttl: 1s\n")
    with pytest.raises(config.ConfigError) as info:
        config.refresh()

    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in message
    assert f"{path}, line 3" in message
    assert "remove it" in message


def test_malformed_yaml_reports_the_exact_line(config_dir):
    path = write(config_dir, "tabs.yaml", "a: 1\nb: 2\n\tc: 3\n")
    with pytest.raises(config.ConfigError, match=r"tabs\.yaml, line 3"):
        config.read_file(str(path))


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "[]\n", "just words\n"])
def test_top_level_must_be_a_mapping(config_dir, text):
    path = write(config_dir, "not-a-mapping.yaml", text)
    with pytest.raises(config.ConfigError) as info:
        config.refresh()

    assert str(path) in str(info.value)
    assert "not a mapping" in str(info.value)
