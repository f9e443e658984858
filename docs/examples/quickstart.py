from celery import Celery
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask, current_session


class Base(DeclarativeBase):
    pass


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))


app = Celery("shop", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/0")
app.conf.async_session_url = "postgresql+asyncpg://app@127.0.0.1/shop"


@app.task(bind=True, base=AsyncSessionTask)
async def rename(self: AsyncSessionTask, book_id: int, title: str) -> str:
    book = await self.session.get_one(Book, book_id)
    book.title = title
    await self.session.commit()
    return book.title


async def count_books() -> int:  # deep in the app's own ORM layer
    count = await current_session().scalar(select(func.count()).select_from(Book))
    return count or 0


@app.task(base=AsyncSessionTask)
async def inventory() -> str:
    return f"{await count_books()} books"
