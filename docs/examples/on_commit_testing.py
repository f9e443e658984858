"""A task that queues another with ``delay_on_commit``, and its test."""

from celery import Celery
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask
from async_session_task.testing import rollback_sessions


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[str] = mapped_column(String(20), unique=True)
    sent: Mapped[bool] = mapped_column(default=False)


app = Celery("billing", broker="redis://127.0.0.1:6379/0")
app.conf.async_session_url = "postgresql+asyncpg://app@127.0.0.1/billing"


@app.task(bind=True, base=AsyncSessionTask)
async def issue_invoice(self: AsyncSessionTask, number: str) -> int:
    invoice = Invoice(number=number)
    self.session.add(invoice)
    await self.session.flush()
    send_invoice.delay_on_commit(invoice.id)  # leaves once the invoice is committed
    await self.session.commit()
    return invoice.id


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def send_invoice(self: AsyncSessionTask, invoice_id: int) -> str:
    invoice = await self.session.get_one(Invoice, invoice_id)
    invoice.sent = True
    return invoice.number


def test_issuing_queues_the_sending() -> None:
    with rollback_sessions(app) as scope:
        invoice_id = issue_invoice.apply(args=("F-1",)).get()

        # Held, not published: this commit only released a savepoint.
        assert scope.on_commit.names == [send_invoice.name]
        assert scope.on_commit.signatures[0].args == (invoice_id,)

        # Run it here, in the scope's transaction, where the invoice exists.
        [sent] = scope.on_commit.release()
        assert sent.get() == "F-1"
