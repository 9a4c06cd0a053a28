"""The reference app's own models: conversations and their messages (SQLAlchemy 2).

These are the app's tables, not the library's: an app that uses sse_blueprint keeps its models
where it likes. Every call is one short transaction; nothing is held while a reply streams.
SQLite calls run in gevent's threadpool so they never block the event loop.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import ForeignKey, String, Text, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.pool import NullPool

from sse_blueprint import create_all, run_blocking

__all__ = ["AIChat", "Base", "ChatStore", "Conversation", "Message"]

T = TypeVar("T")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "chat_conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation", order_by="Message.id", cascade="all, delete-orphan"
    )


class Message(Base):
    __tablename__ = "chat_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("chat_conversations.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # "user" or "assistant"
    content: Mapped[str] = mapped_column(Text, default="")
    #: "done" for user messages; an assistant reply is "streaming" until its stream ends.
    state: Mapped[str] = mapped_column(String(16), default="done")
    stream_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    conversation: Mapped[Conversation] = relationship(back_populates="messages")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "state": self.state,
            "stream_id": self.stream_id,
        }


class AIChat(Base):
    """A chat of the AI SDK page (its id is the client's) and the stream of its reply, if any."""

    __tablename__ = "chat_ai_chats"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    active_stream_id: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(default=_now, onupdate=_now)


class ChatStore:
    """Conversations and messages in the database at ``url``."""

    def __init__(self, url: str) -> None:
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(
            url,
            **(
                {"poolclass": NullPool, "connect_args": {"check_same_thread": False}}
                if sqlite
                else {}
            ),
        )
        self._threaded = sqlite
        self._call(create_all, Base.metadata, self.engine)

    def _call(self, func: Callable[..., T], *args: Any) -> T:
        return run_blocking(func, *args) if self._threaded else func(*args)

    def _session(self, work: Callable[[Session], T]) -> T:
        def run() -> T:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                return work(session)

        return self._call(run)

    def create_conversation(self, title: str) -> dict[str, Any]:
        def work(session: Session) -> dict[str, Any]:
            conversation = Conversation(title=title[:200] or "New chat")
            session.add(conversation)
            session.flush()
            return {"id": conversation.id, "title": conversation.title}

        return self._session(work)

    def conversations(self) -> list[dict[str, Any]]:
        def work(session: Session) -> list[dict[str, Any]]:
            rows = session.scalars(select(Conversation).order_by(Conversation.id.desc()))
            return [{"id": c.id, "title": c.title} for c in rows]

        return self._session(work)

    def conversation(self, conversation_id: int) -> dict[str, Any] | None:
        def work(session: Session) -> dict[str, Any] | None:
            conversation = session.get(Conversation, conversation_id)
            if conversation is None:
                return None
            return {
                "id": conversation.id,
                "title": conversation.title,
                "messages": [m.to_dict() for m in conversation.messages],
            }

        return self._session(work)

    def add_exchange(
        self, conversation_id: int, text: str
    ) -> tuple[dict[str, Any], int, list[dict[str, str]]] | None:
        """Save the user's message and an empty assistant reply; return the user message, the
        reply's id and the conversation so far (``{"role", "content"}``, the user's message
        last), in one transaction."""

        def work(session: Session) -> tuple[dict[str, Any], int, list[dict[str, str]]] | None:
            conversation = session.get(Conversation, conversation_id)
            if conversation is None:
                return None
            history = [{"role": m.role, "content": m.content} for m in conversation.messages]
            user = Message(conversation_id=conversation_id, role="user", content=text)
            reply = Message(conversation_id=conversation_id, role="assistant", state="streaming")
            session.add_all([user, reply])
            session.flush()
            return user.to_dict(), reply.id, [*history, {"role": "user", "content": text}]

        return self._session(work)

    def update_message(self, message_id: int, **values: Any) -> None:
        def work(session: Session) -> None:
            session.execute(update(Message).where(Message.id == message_id).values(**values))

        self._session(work)

    def set_active_stream(self, chat_id: str, stream_id: str | None) -> None:
        """Remember (or forget) the stream writing the reply of AI SDK chat ``chat_id``."""

        def work(session: Session) -> None:
            chat = session.get(AIChat, chat_id)
            if chat is None:
                session.add(AIChat(id=chat_id, active_stream_id=stream_id))
            else:
                chat.active_stream_id = stream_id

        self._session(work)

    def active_stream(self, chat_id: str) -> str | None:
        def work(session: Session) -> str | None:
            chat = session.get(AIChat, chat_id)
            return chat.active_stream_id if chat is not None else None

        return self._session(work)
