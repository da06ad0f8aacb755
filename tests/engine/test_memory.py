from neurond.engine.memory import check

MiB = 2**20


def test_fits_and_refuses_with_numbers():
    info = {0: {"free_bytes": 1000 * MiB, "kv_bytes_per_token": 128 * 1024, "act_bytes_per_token": 64 * 1024},
            1: {"free_bytes": 500 * MiB, "kv_bytes_per_token": 128 * 1024, "act_bytes_per_token": 64 * 1024}}
    assert check(info, 1000, 1000).fits
    verdict = check(info, 2000, 2000)  # 4000 x 128 KiB + 2000 x 64 KiB = 625 MiB > 450 MiB usable on rank 1
    assert not verdict.fits and verdict.rank == 1
    text = verdict.message(2000, 2000)
    assert "625 MiB" in text and "450 MiB" in text and "rank 1" in text


def test_no_information_means_no_refusal():
    assert check({}, 10**6, 10**6).fits
    assert check({0: {"dtype": "float32"}}, 10**6, 10**6).fits
