

def test_drain_resolves_every_item_once(app):
    seen = []

    @app.processor("orders", batch_size=20, concurrency=3)
    def handle(item):
        seen.append(item.id)

    app.submit_many("orders", [{"i": i} for i in range(200)])
    app.run_worker(stop_when_empty=True, install_signal_handlers=False)
    assert sorted(seen) == list(range(1, 201))
    assert app.stats()["orders"]["resolved"] == 200
